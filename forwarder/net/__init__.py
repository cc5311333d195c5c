"""The DICOM network engine: PDUs and DIMSE command sets, associations (SCU), channels that send
one file and classify its outcome, presentation contexts, TLS, and the Storage SCP."""
