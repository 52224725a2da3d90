"""`lmt platform watch` prints the ledger's streams readably."""

from __future__ import annotations

from lmt.agent.platform import format_record


def test_an_interval_a_loss_figure_and_a_bill_are_printed() -> None:
    line = format_record("t1", "intervals", {
        "seq": 5, "ts": 1784081700, "kind": "meter", "meter": "main-meter",
        "start": 1784080800, "end": 1784081700, "import_kwh": 45.91, "period": "flat",
        "cost": 28.4642, "kgco2": 27.445, "quality": "complete"}, False)
    assert "intervals#5" in line and "main-meter" in line and "45.91 kWh flat 28.46" in line
    assert "27.4 kgCO2 complete" in line
    line = format_record("t1", "intervals", {
        "seq": 6, "ts": 1784081700, "kind": "loss", "group": "hall", "start": 1784080800,
        "end": 1784081700, "main_kwh": 50.0, "sub_kwh": 44.0, "loss_kwh": 6.0,
        "loss_pct": 12.0, "status": "over"}, True)
    assert "(historical)" in line and "loss hall" in line and "loss 6.0 kWh (12.0 %) over" in line
    line = format_record("t1", "bills", {
        "seq": 1, "ts": 1784131200, "meter": "main-meter", "kind": "day",
        "label": "2026-07-15", "final": True,
        "bill": {"energy_kwh": 4400.0, "total": 2716.8, "currency": "CNY",
                 "energy_cost": 2660.0, "demand_charge": 56.8, "kgco2": 2630.3}}, False)
    assert "day bill 2026-07-15 main-meter (final): 4400.0 kWh, total 2716.8 CNY" in line
