"""The DICOM network engine: PDUs and DIMSE command sets, the SCU's socket transport, association
control and associations, channels that send one file, what a C-STORE status means, presentation
contexts, TLS, and the Storage SCP."""
