"""The MSO case workflow: case lifecycle, operations, issues, appointments and invoices."""
