"""The id map: the only code that turns native ids into the gateway's ids and back.

A message, a person or a group has one canonical id (``gateway.ids``) and a
native id on each platform it reached; the store keeps the rows (``Tx.map``,
``lookup``, ``native_for``, ``remap``). Here:

* ``refs``: the typed references (``MessageRef``, ``PersonRef``, ``CopyRef``,
  ``GroupRef``; ``Refs`` of one event, ``Outward`` for one target) and the
  storage form of an outbox row's pending references;
* ``resolve.IdMap``: inside the event's transaction, every reference of an
  event native -> canonical once (``inbound``) and canonical -> each target's
  ids once per target (``outbound``);
* ``people``: who a native person id is and how a person is shown on a target
  (their own account, or a stand-in no more revealing than their identity level);
* ``completion``: at delivery, the pending references the target has named since.
"""

from gateway.idmap.completion import Completion
from gateway.idmap.people import People
from gateway.idmap.refs import (
    CopyRef,
    MessageRef,
    Outward,
    Person,
    PersonRef,
    Refs,
    decode_pending,
    encode_pending,
)
from gateway.idmap.resolve import IdMap, acting_actor
from gateway.ids import GroupRef

__all__ = ["IdMap", "Completion", "People", "Refs", "Outward", "Person", "MessageRef", "PersonRef", "CopyRef",
           "GroupRef", "encode_pending", "decode_pending", "acting_actor"]
