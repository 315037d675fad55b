"""What programs cost, read from the compiled programs: FLOPs, bytes exchanged, memory per device."""
