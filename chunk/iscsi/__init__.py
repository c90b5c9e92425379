"""iSCSI target protocol layer (RFC 7143): PDUs, text keys, negotiation, CHAP.

Pure encoding and rule logic, no sockets or policy: the connection and login
state machines that use it live elsewhere, so this layer can be tested byte by
byte against the RFC and against real initiators.
"""
