"""An example pydmq routing script: ``pydmq run -c node.toml --script examples/route.py``.

It is what a Kamailio ``request_route`` for a DMQ node with REGISTER replication looks like, in
Python (see docs/scripting.md):

* KDMQ from other nodes goes to the DMQ channels; a custom channel ``lab`` is answered here;
* REGISTER: the docs' example. From a DMQ node: already authenticated there, just "save". From a
  client: "authenticate and save", answer, then replicate to every other node, skipping the loop
  test that ``dmq_is_from_node()`` has just done;
* MESSAGE to ``sip:announce@...``: broadcast its body on the ``lab`` channel;
* OPTIONS: 200; anything else: 404.

The "location table" is a dict in this module: it only shows where a real service would store
the contact.
"""

from __future__ import annotations

import logging

from pydmq.script import Msg

log = logging.getLogger("route")

#: AoR -> Contact header value, filled by REGISTER (this node's and the replicated ones).
location: dict[str, str] = {}


def save(msg: Msg) -> None:
    """Stand-in for registrar's save(): remember the contact, answer 200."""
    contact = msg.headers.get("Contact")
    aor = msg.ruser or "?"
    if contact:
        location[aor] = contact
    msg.reply(200, "OK", headers=[("Contact", contact)] if contact else ())


def request_route(msg: Msg) -> None:
    if msg.method == "KDMQ":
        if msg.ruser == "lab":  # a channel this script answers itself, before DMQ sees it
            log.info("lab message from %s: %r", msg.source_ip, msg.body)
            msg.reply(200, "OK")
            return
        msg.dmq_handle_message()  # 404 for unknown channels; the channel answers otherwise
        return

    if msg.method == "OPTIONS":
        msg.reply(200, "OK")
        return

    if msg.method == "REGISTER":
        if msg.dmq_is_from_node() > 0:
            # coming from a DMQ node - already authenticated there: just save the contact
            save(msg)
        else:
            # coming from an end point - authenticate (not shown), save, replicate
            save(msg)
            msg.dmq_t_replicate(1)  # source address checked above: skip the loop test
        return

    if msg.method == "MESSAGE" and msg.ruser == "announce":
        rc = msg.dmq_bcast_message("lab", msg.body, msg.headers.get("Content-Type", "text/plain"))
        msg.reply(200 if rc > 0 else 500, "Announced" if rc > 0 else "Not Announced")
        return

    msg.reply(404, "Not Found")
