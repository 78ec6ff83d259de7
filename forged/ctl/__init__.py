"""The operator's commands, one per module.

`forged` (no daemon needed): `probe.py` (probe, check-config, show-profile). `forgectl`: `status.py`,
`plan.py` (offline: the KV table for a model and a profile), `bench.py` (running a load test) and
`bench_report.py` (its report, plot and comparison of saved runs), `doctor.py`, `diagnose.py`,
`engine.py` (`engine build`, offline), `model.py` (`model install`, offline).

`client.py` is the HTTP client (UNIX socket by default, TCP with --url), `promtext.py` reads
/metrics through prometheus_client's own text parser, `levers.py` names the profile's levers. Each
forgectl command module has `add_parser(sub)` and `main(args)`, wired into `forged.cli.forgectl_main`.
"""
