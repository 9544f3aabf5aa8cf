"""Conversion between asymlora adapters and other adapter formats."""

from asymlora.interop.peft import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
