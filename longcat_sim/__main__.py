from longcat_sim.cli import entry

entry()
