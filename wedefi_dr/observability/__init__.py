"""What the product tells people: the audit trail, metrics and notifications."""
