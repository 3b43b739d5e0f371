"""Configuration as data: the pydantic schema, YAML loading with line numbers, scenario expansion,
model references, device profiles and topology generators. No effects."""
