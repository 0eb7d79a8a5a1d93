"""Built-in plugin ``monitoring``: node time series, history, the dashboard, alarms, Prometheus.

Endpoints (under ``/api/v1.0``):

- ``POST /index/get_top_data/`` (#1): the five busiest nodes by CPU, disk use, memory and
  management-NIC traffic over ``statis_period`` seconds (1 < p < 60); equal values are ordered by
  node name, then uuid;
- ``GET /index/get_resource_statistic/`` (#2): node, instance, terminal, pool and alarm counts and
  the licence fields;
- ``GET /monitor_mgr/nodes/`` (#136), ``POST /monitor_mgr/node/current_perf/`` (#137),
  ``GET /monitor_mgr/node/history/`` and ``/monitor_mgr/node/history_perf/`` (#138, parameters as
  query string or JSON body);
- beyond the contract: ``/monitor_mgr/alarm_rules`` (list, create, change, delete),
  ``/monitor_mgr/alarms`` (records) and ``/monitor_mgr/metrics`` (Prometheus text format).

Data flow: the nodes plugin's watchers fire ``kvmdesk_node_metrics`` with every heartbeat; the samples
of the last ``[monitoring] raw_seconds`` stay in memory (:mod:`.samples`) and are summed into minute
points: the recent hours in memory and in inserted fragments, older ones sealed into day documents
(:mod:`.rollups`, :mod:`.days`), expired after ``retention_days``.

Decisions where the contract is silent:

- ``current_perf`` averages the samples of the period, each weighted by the seconds it covers; a
  period shorter than the heartbeat interval uses the latest sample while it is fresh (two
  intervals); ``time`` lists the samples' times.  The process list is asked of each node's agent
  when the request comes (it is not part of the heartbeat); an unreachable node answers ``[]``.
- ``history``'s axis is ``statis_hours * 60 / step_minutes`` whole steps, aligned to multiples of the
  step since the Unix epoch, ending with the last completed step; a step without data is ``null``.
- Disk use is the node's storage filesystems together (roles sharing one filesystem count once);
  NIC traffic in the top five is received plus sent on the management NIC, in bytes per second.
- Instances are the libvirt domains the nodes report (every template and desktop is one); other
  plugins add what is not a domain (e.g. terminals) through ``kvmdesk_resource_counts``; until a
  terminals plugin exists the terminal counts are 0.  ``alarm_node_cnt`` counts the nodes with an
  open alarm; ``alarm_records_cnt`` every alarm record.
- Licence: an open-source build has none: ``license_status`` 1 (full version), ``trial_days`` 0,
  ``license_terminal_cnt`` 0 (no limit); all three are settings of ``[monitoring]``.
- The node list's ``status`` is ``active``, ``warning`` or ``error`` (offline).

Configuration: the ``[monitoring]`` section (:data:`kvmdesk.plugins.monitoring.monitor.DEFAULTS`).
"""
from kvmdesk.plugins.monitoring.plugin import *  # noqa: F401,F403  (the hook implementations)
