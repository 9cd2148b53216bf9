"""intake: an organisation's security@ mailbox as a service. See README.md, section Architecture, for the layout."""
