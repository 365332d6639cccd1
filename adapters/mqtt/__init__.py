"""MQTT sites: sites that publish and receive CloudEvents on an MQTT 5 broker (docs/mqtt.md)."""
