"""JSON-RPC 2.0 for a pydmq node, shaped like Kamailio's ``jsonrpcs`` (see ``docs/rpc.md``).

* :mod:`pydmq.rpc.protocol`: request/reply envelopes, Kamailio's JSON layout, the dispatcher;
* :mod:`pydmq.rpc.methods`: ``dmq.list_nodes``, ``dmq.remove``, ... for a ``DmqNode``;
* :mod:`pydmq.rpc.server`: HTTP and unix datagram listeners (``start_rpc``);
* :mod:`pydmq.rpc.client`: ``call()`` / ``request()``, used by ``pydmq rpc``.

Nothing is imported here, so the client stays cheap to import.
"""
