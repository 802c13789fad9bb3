from probe.cli.main import cli

cli(prog_name="probe")
