"""Test support: Kamailio nodes (``kamailio``), sipp (``sipp``), raw SIP and ports (``net``)."""
