"""Throughput benchmark: forwarder against DCMTK storescu, both sending to storescp --ignore.

Run ``make bench`` (or ``.venv/bin/python -m bench --help``); see bench/README.md.
"""
