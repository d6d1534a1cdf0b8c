"""ebRIM 3.0 metadata of XDS.b and XDS-I.b: model, codec, validation, queries."""
