"""The load tester behind `sluiceway bench` and `sluiceway demo`."""
