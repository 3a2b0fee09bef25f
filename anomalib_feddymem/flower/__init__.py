"""FedDyMem as a Flower app, for sites on different machines.

``server_app.app`` (a ``ServerApp``) runs the shared round loop
(:func:`~anomalib_feddymem.federation.runner.run_federation`) over Flower messages: its
aggregation is the server step of :mod:`anomalib_feddymem.federation.server`.
``client_app.app`` (a ``ClientApp``) runs the client step of
:mod:`anomalib_feddymem.federation.client` on the partition named in its node config
(``partition-id``, ``num-partitions``) and keeps its state in the node's ``context.state``. Only
Flower records travel (``ArrayRecord``/``ConfigRecord``/``MetricRecord``); nothing is pickled.

Running it (see the README): one ``flower-superlink``, one ``flower-supernode`` per site with
``--node-config "partition-id=<i> num-partitions=<N>"``, then ``flwr run . <connection>``
with the run config of ``[tool.flwr.app.config]`` in pyproject.toml. ``--insecure`` is for
loopback tests only; across machines give the SuperLink ``--ssl-ca-certfile/--ssl-certfile/
--ssl-keyfile`` and the SuperNodes ``--root-certificates``, and turn on SuperNode
authentication with ``--enable-supernode-auth`` on the SuperLink and
``--auth-supernode-private-key/--auth-supernode-public-key`` on each SuperNode (Flower's own
mechanisms).
"""

__all__: list[str] = []
