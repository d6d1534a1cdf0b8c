"""XML namespaces of every message xdsi reads or writes."""

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
XOP = "http://www.w3.org/2004/08/xop/include"
XMIME = "http://www.w3.org/2005/05/xmlmime"

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XDSIB = "urn:ihe:rad:xdsi-b:2009"

# Prefixes used when xdsi writes a message; readers never rely on them.
PREFIXES = {
    "env": SOAP12,
    "wsa": WSA,
    "xop": XOP,
    "rim": RIM,
    "rs": RS,
    "lcm": LCM,
    "query": QUERY,
    "xdsb": XDSB,
    "xdsi": XDSIB,
}


def qname(namespace: str, local: str) -> str:
    """Return the Clark notation ``{namespace}local`` that lxml uses."""
    return f"{{{namespace}}}{local}"


# WS-Addressing 1.0 Core 2.1: the anonymous endpoint (reply on the same
# HTTP connection).
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
