// Parse a DICOM SEG with dcmjs (the library OHIF uses) and print what a viewer needs, as JSON.
const fs = require("fs");
const dcmjs = require("dcmjs");

const asArray = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);
const buffer = fs.readFileSync(process.argv[2]);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const file = dcmjs.data.DicomMessage.readFile(arrayBuffer);
const seg = dcmjs.data.DicomMetaDictionary.naturalizeDataset(file.dict);

const segments = asArray(seg.SegmentSequence).map((s) => {
  const type = asArray(s.SegmentedPropertyTypeCodeSequence)[0] || {};
  const modifier = asArray(type.SegmentedPropertyTypeModifierCodeSequence)[0];
  return {
    number: s.SegmentNumber,
    label: s.SegmentLabel,
    color: asArray(s.RecommendedDisplayCIELabValue),
    category: (asArray(s.SegmentedPropertyCategoryCodeSequence)[0] || {}).CodeValue,
    type: type.CodeValue,
    typeScheme: type.CodingSchemeDesignator,
    modifier: modifier ? modifier.CodeMeaning : null,
    algorithmType: s.SegmentAlgorithmType,
  };
});
const frames = asArray(seg.PerFrameFunctionalGroupsSequence).map((f) => {
  const derivation = asArray(f.DerivationImageSequence)[0] || {};
  const source = asArray(derivation.SourceImageSequence)[0] || {};
  return source.ReferencedSOPInstanceUID || null;
});
const referencedSeries = asArray(seg.ReferencedSeriesSequence).map((s) => s.SeriesInstanceUID);
console.log(JSON.stringify({ sopClass: seg.SOPClassUID, segments, frames, referencedSeries }));
