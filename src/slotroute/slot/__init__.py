"""slotd: owns the box's hardware slots, runs their backends and streams their state."""
