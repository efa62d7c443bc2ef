#!/bin/sh
# Run by busybox acpid when the ACPI power button is pressed (event PWRF/00000080): the test
# guest's clean shutdown. The marker line tells tests the button, not a script, ended the VM.
echo "podvm-guest: power button pressed; powering off" >/dev/console
sync
poweroff -f
