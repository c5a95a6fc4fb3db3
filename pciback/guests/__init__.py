"""The guest side: the front doors through which guests reach the device plane.

Everything that belongs to one guest connection lives here: opening the
listeners' TLS context (:mod:`.listen`), accepting it (:mod:`._accept`), the
server's handshake (:mod:`.handshake`), finding out who is on the other end
(:mod:`.identity`), bounding what it may hold (:mod:`.limits`), sharing the
backend fairly between busy guests (:mod:`.fairness`), serving its session
(:mod:`.session`), answering its requests (:mod:`.dispatch`) and counting it
all (:mod:`.statistics`).

Layer rule: the guest side uses the device plane (``pciback.plane``, the
device models, the policy and the configuration) and ``shared``; nothing in the device plane
imports it, and it never imports operations (``pciback.ops``) or the service.
A second protocol (for example vfio-user) is a second front door in this
folder, on the same device plane.
"""
