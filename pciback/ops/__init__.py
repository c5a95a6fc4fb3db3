"""Operations: what an operator uses to look at and steer a running backend.

The control socket's server (:mod:`.control_server`) and the ``pciback ctl``
client (:mod:`.control_client`), the host view of every PCI device
(:mod:`.hostview`) and the lifecycle helpers: reload planning, systemd
notification and the start-up summary (:mod:`.lifecycle`).

Layer rule: operations talk to the backend through the narrow interface they
define (what ``ctl`` and reload need), never through the service module; they
use the device plane's types, and nothing below them imports them. The
service (the composition root) and the command line sit above.
"""
