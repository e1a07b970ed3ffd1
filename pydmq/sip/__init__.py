"""Sans-I/O SIP: messages, URIs, transactions; plus thin asyncio transports."""
