"""VMBus transport: GPA ranges, Hyper-V rings, pipes, channels, server and client."""
