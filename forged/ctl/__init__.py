"""forgectl's operator commands that talk to a running forged: bench, doctor, diagnose.

`client.py` is the HTTP client (UNIX socket by default, TCP with --url), `promtext.py` reads
/metrics through prometheus_client's own text parser. Each command module has `add_parser(sub)` and
`main(args)`, wired into `forged.cli.forgectl_main`.
"""
