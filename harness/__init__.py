"""What the tests and the benches share: the service's processes started as subprocesses."""
