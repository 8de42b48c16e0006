"""The peer: what a team gets from FastAPI's SQL tutorial, written with SQLAlchemy's asyncio ORM.

FastAPI, a session per request from `async_sessionmaker(engine, expire_on_commit=False)` through
`SessionDep`, ORM reads (`select(User)`, `session.get`), `add`, `commit` and `refresh` on create,
pydantic models in and out, HTTPException for 404 and 409; the engine with SQLAlchemy's defaults
(a rollback on every return to the pool, transactions begun implicitly). No middleware, no keys,
no logging. The same routes, JSON and ETag/Location headers as the service, so that it does the
same work for the client. Run by bench/run.py under the same gunicorn configuration as the
service; DATABASE_URL, DB_POOL_SIZE and DB_MAX_OVERFLOW as for the service, so every pool is as big.
"""

import os
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, field_serializer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from models import User

engine = create_async_engine(
    os.environ["DATABASE_URL"],
    pool_size=int(os.environ.get("DB_POOL_SIZE", 10)),
    max_overflow=int(os.environ.get("DB_MAX_OVERFLOW", 5)),
    # SQLAlchemy's MySQL documentation: utf8mb4, or the server's default character set decides.
    connect_args={"charset": "utf8mb4"},
)
# expire_on_commit=False: the created user's attributes stay readable after the commit.
SessionFactory = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionFactory() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

app = FastAPI()


class UserCreate(BaseModel):
    email: str
    name: str
    is_active: bool = True


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    is_active: bool
    created_at: datetime
    updated_at: datetime

    # The service's format: six fractional digits always, and +00:00 (pydantic writes Z, and drops zeros).
    @field_serializer("created_at", "updated_at")
    def rfc3339(self, value: datetime) -> str:
        return value.isoformat(timespec="microseconds")


class Page(BaseModel):
    items: list[UserPublic]
    next_cursor: str | None


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/api/v1/users", response_model=Page)
async def list_users(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20, cursor: str | None = None
) -> dict[str, Any]:
    after = int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True) if cursor else 0
    users = (await session.scalars(select(User).where(User.id > after).order_by(User.id).limit(limit + 1))).all()
    next_cursor = None
    if len(users) > limit:
        next_cursor = urlsafe_b64encode(users[limit - 1].id.to_bytes(8, "big", signed=True)).decode().rstrip("=")
    return {"items": users[:limit], "next_cursor": next_cursor}


@app.post("/api/v1/users", response_model=UserPublic, status_code=201)
async def create_user(new: UserCreate, session: SessionDep, response: Response) -> User:
    now = datetime.now(UTC)
    user = User(**new.model_dump(), email_key=new.email.lower(), created_at=now, updated_at=now, version=1)
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(status_code=409, detail="taken") from None
    await session.refresh(user)
    response.headers["Location"] = f"/api/v1/users/{user.id}"
    response.headers["ETag"] = f'"{user.version}"'
    return user


@app.get("/api/v1/users/{user_id}", response_model=UserPublic)
async def get_user(user_id: int, session: SessionDep, response: Response) -> User:
    user = await session.get(User, user_id)
    if not user:
        raise HTTPException(status_code=404, detail="not found")
    response.headers["ETag"] = f'"{user.version}"'
    return user
