"""The embedded default MSA model (trained by msabank.train); see README.md in this folder."""
