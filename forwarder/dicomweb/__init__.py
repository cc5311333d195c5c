"""DICOMweb: STOW-RS destinations (PS3.18) over HTTP(S), with the outcomes of C-STORE.

``multipart`` streams the request body from disk, ``response`` reads what the server says of
each instance, ``auth`` reads the secrets, ``http`` holds the pooled urllib3 connection and its
errors, ``channel`` drives them with the interface of :class:`forwarder.net.channel.Channel`.
Only this package imports urllib3.
"""
