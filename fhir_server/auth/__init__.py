"""SMART-on-FHIR authorization: who is calling (principal), what their token allows (scopes),
what the MSO rules let them see (policy), and the OAuth 2.0 authorization server itself."""
