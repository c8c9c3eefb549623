"""Avro schemas and single-object codecs for every record that crosses a process boundary."""

from schemas.codec import RECORD_NAMES, decode, encode, fingerprint, record_name, schema, versions

__all__ = ["RECORD_NAMES", "decode", "encode", "fingerprint", "record_name", "schema", "versions"]
