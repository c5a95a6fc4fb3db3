"""Operations: what an operator uses to look at and steer a running backend.

The control socket's server (:mod:`.control_server`) and the ``pciback ctl``
client (:mod:`.control_client`), the host view of every PCI device
(:mod:`.hostview`) and the lifecycle helpers: reload planning, systemd
notification and the start-up summary (:mod:`.lifecycle`), and the one
interface through which all of them reach the backend (:mod:`.interface`).

Layer rule: operations talk to the backend through the narrow interface they
define (:class:`.interface.OperatedBackend`: what ``ctl`` and reload need),
never through the service module, and never import the guest side; they
use the device plane's types, and nothing below them imports them. The
service (the composition root) and the command line sit above.
"""
