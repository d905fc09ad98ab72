FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --no-input -v 0
RUN useradd --create-home gateway && mkdir -p /var/spool/gateway && chown gateway /var/spool/gateway
USER gateway
EXPOSE 8000
# --no-proxy-headers: X-Forwarded-For is the gateway's to judge (GATEWAY_TRUSTED_PROXIES).
CMD ["uvicorn", "gateway_project.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--no-proxy-headers"]
