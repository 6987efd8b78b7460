"""How requests reach the engine and answers leave it: Thrift over TCP.

``thrift`` serves framed binary Thrift connections (frame limits, the frame guard, error
replies), ``frame_guard`` refuses forged frames before they are decoded, ``codec`` converts
wire structs and tensors, ``wire_errors`` maps our errors to and from the IDL's, ``handler``
maps the IDL's methods onto the engine, ``client`` is the sync and asyncio client, and
``balancer`` spreads a client's calls over replicas (``targets=``).
"""
