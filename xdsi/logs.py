"""The node's logging policy: no patient data in the log above DEBUG.

Who saw which patient belongs in the audit trail (ITI TF-2 3.20); the log
says what the node did without the values it handled.
"""

import logging
import warnings


def quiet_pydicom(level: int) -> None:
    """Keep pydicom's complaints about values out of the log but at DEBUG.

    pydicom quotes a value it finds invalid ("Invalid value for VR DA:
    '1970-01-01'"), and the value may be a patient's birth date or name. It
    logs the complaint at WARNING and also raises it as a Python warning,
    which would print it a second time; the node reports what it refuses
    in its own words, without values. Every process that reads DICOM sets
    this: the command line's and each HTTP worker's.
    """
    logging.getLogger("pydicom").setLevel(
        logging.DEBUG if level <= logging.DEBUG else logging.ERROR
    )
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
