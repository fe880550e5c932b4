"""The OpenAI-compatible HTTP server over the inference engine (`app`, `schemas`). The only
package that imports the web framework."""
