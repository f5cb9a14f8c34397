"""CURVE keys as ZeroMQ writes them (Z85): shared by the socket options and the probe modules."""

import re

# A 32-byte CURVE key in Z85: 40 characters of its alphabet.
Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
