"""``dicom-node pull``: query a PACS (``sources``), decide per series by the rules, and
retrieve what is to be processed into the node's receive path.

``common`` holds the values the modules share (``PullFilter``, ``SeriesFound``) and the
one error, ``PullError`` (a query or retrieve that failed, with the source named);
``query`` finds series (C-FIND, QIDO-RS), ``decide`` applies the rules at series level,
``retrieve`` brings a series in (C-GET and WADO-RS into ``receive.intake``; C-MOVE to
the node's own SCP), ``puller`` runs a pull (resume, concurrency, time window, progress).
"""
