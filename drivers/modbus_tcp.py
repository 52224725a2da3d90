"""Compatibility: the Modbus driver lives in :mod:`lmt.drivers.modbus` (and ``modbus_rtu``)."""

from .modbus import ModbusBus, ModbusDevice, ModbusTcpBus  # noqa: F401
