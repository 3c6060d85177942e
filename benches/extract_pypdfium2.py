"""The Python side of `cargo bench --bench extract`: what the old DocuSearch worker did per PDF
page with pypdfium2 (render at the given DPI, PIL bicubic resize to the model's square size,
page text), timed the same way as the Rust side. Prints one JSON object on stdout.

Needs pypdfium2 and Pillow: python extract_pypdfium2.py DPI SIZE REPEATS FILE...
"""

import json
import sys
import time

try:
    import pypdfium2 as pdfium
    from PIL import Image
except ImportError as e:  # say what to install instead of a traceback
    print(json.dumps({"error": f"{e}; this Python needs pypdfium2 and Pillow"}))
    sys.exit(2)


def one_pass(files, dpi, size):
    pages = 0
    words = 0
    timing = {"render": 0.0, "resize": 0.0, "text": 0.0}
    start = time.perf_counter()
    for path in files:
        doc = pdfium.PdfDocument(path)
        for page in doc:
            t0 = time.perf_counter()
            img = page.render(scale=dpi / 72).to_pil().convert("RGB")
            t1 = time.perf_counter()
            img.resize((size, size), Image.BICUBIC)
            t2 = time.perf_counter()
            textpage = page.get_textpage()
            words += len(textpage.get_text_range().split())
            textpage.close()
            t3 = time.perf_counter()
            timing["render"] += t1 - t0
            timing["resize"] += t2 - t1
            timing["text"] += t3 - t2
            page.close()
            pages += 1
        doc.close()
    return {"pages": pages, "words": words, "seconds": time.perf_counter() - start, **timing}


def main():
    dpi, size, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    files = sys.argv[4:]
    runs = [one_pass(files, dpi, size) for _ in range(repeats)]
    info = {
        "pypdfium2": pdfium.version.PYPDFIUM_INFO.version,
        "pdfium": str(pdfium.version.PDFIUM_INFO.build),
        "pillow": Image.__version__,
        "python": sys.version.split()[0],
    }
    print(json.dumps({"runs": runs, "versions": info}))


if __name__ == "__main__":
    main()
