from forged.cli import forged_entry

forged_entry()
