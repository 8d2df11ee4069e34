"""CSV downloads a spreadsheet opens safely: text that looks like a formula stays text."""
import csv
import io

from give_way import give_way

# OWASP "CSV injection": a cell starting with one of these runs as a formula in Excel,
# LibreOffice or Google Sheets (=HYPERLINK(...) leaks data, =cmd|... ran commands).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell):
    """A text cell starting like a formula, prefixed with a single quote; numbers stay numbers
    (callers pass numbers as int/Decimal, so a negative amount is never mistaken for text)."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def csv_chunks(header, rows, rows_per_chunk=500):
    """CSV text of `header` and `rows` (sequences of cells), every text cell neutralised,
    yielded a chunk at a time so a million rows never sit in memory; between chunks a gevent
    worker's other requests get a turn (an export stalled them all: 50,000 rows, 1.8 s)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([neutralise(cell) for cell in header])
    for count, row in enumerate(rows, 1):
        writer.writerow([neutralise(cell) for cell in row])
        if count % rows_per_chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            give_way()
    yield buffer.getvalue()
