"""The audit trail: an AuditEvent for every interaction, login and token event, shaped after
IHE Basic Audit Log Patterns, and a Provenance for every write."""
