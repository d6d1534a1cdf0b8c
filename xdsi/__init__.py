"""xdsi: an IHE XDS-I.b exchange node.

Document Registry, Document Repository, Imaging Document Source and Imaging
Document Consumer, each a service that talks to the others only over the
wire (SOAP 1.2 with MTOM/XOP, HL7 v2 over MLLP).
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
