"""The controller's access to node agents, below the plugins: every plugin that touches nodes uses it.

:mod:`kvmdesk.nodeaccess.client` holds the signed agent client (:class:`~kvmdesk.nodeaccess.client.AgentClient`),
its errors and their catalogue codes; :mod:`kvmdesk.nodeaccess.tunnel` opens an agent's console tunnel
(a signed upgrade to a byte stream, for the console relay).  The nodes plugin creates the one client of the process and
publishes it as ``core.extensions["agents"]``; other plugins import only this package's types and errors.
What the agent itself must agree on (paths, payloads, error codes) lives in :mod:`kvmdesk.protocol`.
"""
