"""Insights from the vehicle state and position: geofences, trips, charging sessions,
battery health."""
