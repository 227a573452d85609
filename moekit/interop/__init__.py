"""moekit.interop: adapters between moekit's models and other libraries' formats (Hugging Face)."""
