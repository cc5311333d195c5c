"""DICOM files: Part 10 parsing and the end-to-end data set check, and conversion between the
uncompressed transfer syntaxes. Knows nothing of the network, the queue or the daemon."""
